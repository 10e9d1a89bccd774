defmodule SnakepitShm.Bench.ClusterReport do
  @moduledoc "The RESULTS.md section of the `cluster` part (issue 18)."

  alias SnakepitShm.Bench.{Format, Stats}

  def section(c) do
    rows =
      for size <- c.sizes,
          by = c.by_size[size],
          method <- [:fetch, :erpc, :erpc_cached] do
        m = by[method]

        [
          Format.bytes(size),
          label(method),
          Format.rate_summary(size, m.ns),
          Format.time_summary(m.ns),
          ratio_to_fetch(by, method),
          mib(Enum.max(m.peak_peer)),
          mib(Enum.max(m.peak_local))
        ]
      end

    """
    ## 8. Between two nodes: fetch/2 against :erpc

    A peer VM on this machine (OTP `:peer`, distribution over the loopback) holds the
    region; this VM copies it. GB/s and time are medians of #{c.rounds} rounds (range);
    in each round every method runs once, order rotated. "vs fetch" is fetch's time
    over the method's, per round (above 1: the method was faster). The last two columns
    are the worst rise of `:erlang.memory(:binary)` seen (every 2 ms) on each VM.

    #{Format.table(["size", "method", "GB/s", "time", "vs fetch", "peer binary peak", "local binary peak"], rows)}
    `fetch` writes into a new local region (4 MiB chunks, a window of 4, CRC-32 per chunk
    and over the whole); `erpc` has the peer read the region into one binary and return
    it; `erpc (cached)` returns a binary the peer already holds (the link alone).
    """
  end

  defp label(:fetch), do: "fetch/2 into a region"
  defp label(:erpc), do: "erpc (read + return)"
  defp label(:erpc_cached), do: "erpc (cached binary)"

  defp ratio_to_fetch(_by, :fetch), do: "1×"

  defp ratio_to_fetch(by, method),
    do: Format.ratio(Stats.paired_ratio(by.fetch.ns, by[method].ns))

  defp mib(bytes), do: "#{Format.num(bytes / 1_048_576)} MiB"
end
