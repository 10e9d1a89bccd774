load dir."common.gp"
set title "Handoff to a persistent Python worker (xor-reduce of every byte)"
set xlabel "payload"
set ylabel "throughput, GB/s (median, bars: min–max)"
set logscale x 2
set logscale y 10
set xrange [2048:2147483648]
set xtics ("4 KiB" 4096, "64 KiB" 65536, "1 MiB" 1048576, "16 MiB" 16777216, "64 MiB" 67108864, "256 MiB" 268435456, "1 GiB" 1073741824)
set key bottom right
f = datadir."/handoff.dat"
plot f using 1:2:3:4 with yerrorlines lw 2 pt 7 title "(a) fresh region", \
     f using 1:5:6:7 with yerrorlines lw 2 pt 5 title "(b) warm region", \
     f using 1:8:9:10 with yerrorlines lw 2 pt 9 title "(c) Erlang Port, packet 4", \
     f using 1:11:12:13 with yerrorlines lw 2 dt 3 pt 9 title "(c') Port, 1 MiB pipe", \
     f using 1:14:15:16 with yerrorlines lw 2 pt 11 title "(d) Unix socket", \
     f using 1:17:18:19 with yerrorlines lw 2 dt 2 pt 13 title "(e) C++ memcpy + read pass"
