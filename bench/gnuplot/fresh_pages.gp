load dir."common.gp"
set title "Cost of the pages of a new region, per GiB"
set ylabel "ms per GiB (median, bars: min–max)"
set style data histogram
set style histogram errorbars gap 1 lw 1
set style fill solid 0.6 border -1
# Labels hang down-left from their bar, so the last one cannot run off the right edge.
set xtics rotate by 30 right nomirror
set bmargin 11
set lmargin 14
set rmargin 4
set yrange [0:*]
set key off
plot datadir."/fresh_pages.dat" using 2:3:4:xtic(1) lc rgb "#d8703b"
