# Shared look of every bench plot. Called with -e "datadir='...'; out='...'".
set terminal pngcairo size 900,560 enhanced font "DejaVu Sans,10"
set output out
set grid ytics mytics xtics lc rgb "#dddddd"
set key top left box opaque
set border lc rgb "#444444"
