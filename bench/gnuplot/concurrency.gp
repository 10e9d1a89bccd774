load dir."common.gp"
set title "Lifecycle cycles per second, N concurrent BEAM processes"
set xlabel "processes"
set ylabel "cycles/s (median, bars: min–max)"
set style data histogram
set style histogram errorbars gap 2 lw 1
set style fill solid 0.6 border -1
set yrange [0:*]
set key off
plot datadir."/concurrency.dat" using 2:3:4:xtic(1) lc rgb "#3b7dd8"
