load dir."common.gp"
set title "Lifecycle of a 4 KiB region: allocate, map, write, unmap, deallocate"
set xlabel "cycle latency, µs"
set ylabel "fraction of cycles at or below"
set logscale x 10
set yrange [0:1]
set key bottom right
plot datadir."/lifecycle_elixir.dat" using 1:2 with lines lw 2 title "snakepit\\_shm (Elixir)", \
     datadir."/lifecycle_python.dat" using 1:2 with lines lw 2 title "Python multiprocessing.shared\\_memory"
