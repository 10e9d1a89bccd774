load dir."common.gp"
set title "Handoff to a persistent Python worker (xor-reduce of every byte)"
set xlabel "payload"
set ylabel "throughput, GB/s (median, bars: min–max)"
set logscale x 2
set logscale y 10
set offsets graph 0.04, graph 0.04, 0, 0
# Ticks only at the sizes measured (column 20 holds their labels).
set xtics () nomirror
set key bottom right
f = datadir."/handoff.dat"
# Targets (ratios in one run, see RESULTS.md), drawn from the Port and the C++ floor:
# warm >= 10x the Port and >= 0.7x the floor, fresh >= 2x the Port.
plot f using 1:2:3:4:xtic(20) with yerrorlines lw 2 pt 7 title "(a) fresh region", \
     f using 1:5:6:7 with yerrorlines lw 2 pt 5 title "(b) warm region", \
     f using 1:8:9:10 with yerrorlines lw 2 pt 9 title "(c) Erlang Port, packet 4", \
     f using 1:11:12:13 with yerrorlines lw 2 dt 3 pt 9 title "(c') Port, 1 MiB pipe", \
     f using 1:14:15:16 with yerrorlines lw 2 pt 11 title "(d) Unix socket", \
     f using 1:17:18:19 with yerrorlines lw 2 dt 2 pt 13 title "(e) C++ memcpy + read pass", \
     f using 1:($8*10) with lines lw 1 dt 4 lc rgb "#2a7f3f" title "target for (b): 10 x (c)", \
     f using 1:($17*0.7) with lines lw 1 dt 5 lc rgb "#7a3fa0" title "target for (b): 0.7 x (e)", \
     f using 1:($8*2) with lines lw 1 dt 4 lc rgb "#aa0000" title "target for (a): 2 x (c)"
