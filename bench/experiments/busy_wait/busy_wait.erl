%% bench/experiments/busy_wait (bench/FINDINGS.md section 7, fourth pass). Not part of
%% the product. A probe process sleeps 1 ms in a loop on a normal scheduler while 100 ms
%% of CPU work runs in each of several ways; rounds rotate the order. Printed per mode:
%% the median and 75th percentile of each round's worst lateness, and the 99th
%% percentile and share above 2 ms of all the probe's sleeps; how long the work took.
%%
%%   cd bench/experiments/busy_wait
%%   gcc -O2 -fPIC -shared -I$(erl -noshell -eval 'io:format("~s",[code:root_dir()]),halt().')/usr/include \
%%       -o busy_wait.so busy_wait.c && erlc busy_wait.erl
%%   erl -noshell -eval 'busy_wait:run(16), halt().'              # default flags
%%   erl +sbwt none -noshell -eval 'busy_wait:run(16), halt().'   # no busy wait
%%
%% On a machine shared with other work, run it in its own autogroup with a high weight,
%% which gives the VM the machine as if it were quiet while keeping the kernel's
%% scheduling between the VM's own threads unchanged (root):
%%   setsid bash -c 'echo -20 > /proc/self/autogroup; exec erl -noshell -eval "busy_wait:run(16), halt()."'
-module(busy_wait).
-export([run/1, spin/2, job/3]).
-on_load(init/0).

init() -> erlang:load_nif(filename:join(filename:dirname(code:which(?MODULE)), "busy_wait"), 0).

spin(_Us, _YieldUs) -> erlang:nif_error(not_loaded).
job(_Policy, _Us, _YieldUs) -> erlang:nif_error(not_loaded).

thread(Policy, Us, YieldUs) ->
    Ref = job(Policy, Us, YieldUs),
    receive {done, Ref} -> ok end.

modes(Data) ->
    [{idle, fun() -> timer:sleep(100) end},
     {otp_crypto_hash, fun() -> crypto:hash(sha256, Data) end},
     {dirty_1ms_slices, fun() -> [spin(1000, 0) || _ <- lists:seq(1, 100)] end},
     {dirty_1ms_slices_yield_100us, fun() -> [spin(1000, 100) || _ <- lists:seq(1, 100)] end},
     {dirty_250us_slices, fun() -> [spin(250, 0) || _ <- lists:seq(1, 400)] end},
     {dirty_one_call, fun() -> spin(100000, 0) end},
     {thread_nice0, fun() -> thread(0, 100000, 0) end},
     {thread_nice0_yield_100us, fun() -> thread(0, 100000, 100) end},
     {thread_nice19_yield_100us, fun() -> thread(1, 100000, 100) end},
     {thread_idle, fun() -> thread(3, 100000, 0) end},
     {thread_idle_yield_100us, fun() -> thread(3, 100000, 100) end}].

run(Rounds) ->
    Data = crypto:strong_rand_bytes(24 * 1024 * 1024),
    Modes = modes(Data),
    N = length(Modes),
    Results =
        lists:foldl(
          fun(Round, Acc) ->
                  {A, B} = lists:split(Round rem N, Modes),
                  lists:foldl(
                    fun({Name, F}, Acc2) ->
                            timer:sleep(10),
                            R = during(F),
                            maps:update_with(Name, fun(L) -> [R | L] end, [R], Acc2)
                    end, Acc, B ++ A)
          end, #{}, lists:seq(1, Rounds)),
    io:format("load ~s", [os:cmd("cut -d' ' -f1-3 /proc/loadavg")]),
    [report(Name, maps:get(Name, Results)) || {Name, _} <- Modes],
    ok.

report(Name, Rs) ->
    Worst = lists:sort([lists:max(S) / 1.0e6 || {_, S} <- Rs]),
    All = lists:sort([X / 1.0e6 || {_, S} <- Rs, X <- S]),
    Took = lists:sort([T / 1.0e6 || {T, _} <- Rs]),
    P = fun(Q, L) -> lists:nth(max(1, round(Q * length(L))), L) end,
    Above = 100 * length([x || X <- All, X > 2.0]) / length(All),
    io:format("~-28s worst/round med ~6.2f p75 ~6.2f | sleeps p99 ~6.2f >2ms ~6.2f% | took ~6.1f ms~n",
              [Name, P(0.5, Worst), P(0.75, Worst), P(0.99, All), Above, P(0.5, Took)]).

%% {ns the work took, [lateness ns of each 1 ms sleep]}
during(F) ->
    Parent = self(),
    Probe = spawn_link(fun() -> probe(Parent, []) end),
    timer:sleep(5),
    T0 = erlang:monotonic_time(nanosecond),
    F(),
    T = erlang:monotonic_time(nanosecond) - T0,
    Probe ! stop,
    receive {Probe, Samples} -> {T, Samples} end.

probe(Parent, Acc) ->
    receive
        stop -> Parent ! {self(), Acc}
    after 0 ->
        Before = erlang:monotonic_time(nanosecond),
        timer:sleep(1),
        Late = erlang:monotonic_time(nanosecond) - Before - 1000000,
        probe(Parent, [Late | Acc])
    end.
