load dir."common.gp"
set title "read/3 of a whole region: sealed (zero-copy) vs unsealed (copy)"
set xlabel "region size"
set ylabel "time per read, µs (median, bars: min–max)"
set logscale x 2
set logscale y 10
set offsets graph 0.04, graph 0.04, 0, 0
# Ticks only at the sizes measured (column 8 holds their labels).
set xtics () nomirror
f = datadir."/zero_copy.dat"
plot f using 1:2:3:4:xtic(8) with yerrorlines lw 2 pt 7 title "sealed: zero-copy binary", \
     f using 1:5:6:7 with yerrorlines lw 2 pt 5 title "unsealed: copying read", \
     50 with lines dt 2 lc rgb "#aa0000" title "50 µs target"
