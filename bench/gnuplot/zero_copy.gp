load dir."common.gp"
set title "read/3 of a whole region: sealed (zero-copy) vs unsealed (copy)"
set xlabel "region size"
set ylabel "time per read, µs (median, bars: min–max)"
set logscale x 2
set logscale y 10
set xrange [524288:2147483648]
set xtics ("1 MiB" 1048576, "16 MiB" 16777216, "64 MiB" 67108864, "256 MiB" 268435456, "1 GiB" 1073741824)
f = datadir."/zero_copy.dat"
plot f using 1:2:3:4 with yerrorlines lw 2 pt 7 title "sealed: zero-copy binary", \
     f using 1:5:6:7 with yerrorlines lw 2 pt 5 title "unsealed: copying read", \
     50 with lines dt 2 lc rgb "#aa0000" title "50 µs target"
