defmodule Snakepit.SharedMemory.IncompleteTest do
  use ExUnit.Case, async: false

  @moduletag :capture_log

  alias Snakepit.SharedMemory.{Cleanup, Incomplete}

  @dir "/dev/shm"

  defp make(content) do
    id =
      "spshm_" <>
        (:crypto.strong_rand_bytes(12)
         |> Base.encode32(case: :lower, padding: false)
         |> binary_part(0, 20))

    path = Path.join(@dir, id)
    File.write!(path, content)
    File.chmod!(path, 0o600)
    on_exit(fn -> File.rm(path) end)
    {id, path}
  end

  describe "sweep/3" do
    test "removes header-less segments nobody has open, at once" do
      {empty, empty_path} = make("")
      {zeroed, zeroed_path} = make(<<0::size(12_288)-unit(8)>>)

      assert Enum.sort(Incomplete.sweep(@dir, [empty, zeroed], true)) ==
               Enum.sort([empty, zeroed])

      assert File.exists?(empty_path) and File.exists?(zeroed_path)

      assert Enum.sort(Incomplete.sweep(@dir, [empty, zeroed], false)) ==
               Enum.sort([empty, zeroed])

      refute File.exists?(empty_path) or File.exists?(zeroed_path)
    end

    test "leaves segments a process has open (being created) and damaged ones" do
      {open_id, open_path} = make(<<0::size(4096)-unit(8)>>)
      {damaged, damaged_path} = make("SPSH" <> <<0::size(4092)-unit(8)>>)
      {:ok, fd} = :file.open(open_path, [:read, :raw])

      try do
        assert Incomplete.sweep(@dir, [open_id, damaged], false) == []
        assert File.exists?(open_path) and File.exists?(damaged_path)
      after
        :file.close(fd)
      end

      assert Incomplete.sweep(@dir, [open_id], false) == [open_id]
    end
  end

  describe "incomplete?/1" do
    test "regular files of ours only" do
      {_id, path} = make("")
      assert Incomplete.incomplete?(path)
      link = path <> "_link"
      File.ln_s!(path, link)
      on_exit(fn -> File.rm(link) end)
      refute Incomplete.incomplete?(link)
      refute Incomplete.incomplete?(Path.join(@dir, "spshm_nosuchfilexxxxxxxx"))
    end
  end

  describe "open_paths/0" do
    test "sees this VM's own descriptors" do
      {_id, path} = make("x")
      {:ok, fd} = :file.open(path, [:read, :raw])
      assert MapSet.member?(Incomplete.open_paths(), path)
      :file.close(fd)
    end
  end

  describe "Cleanup.sweep_orphans/1" do
    test "reports header-less segments as :incomplete" do
      {id, path} = make("")

      assert %{region_id: ^id, reason: :incomplete} =
               Enum.find(Cleanup.sweep_orphans(), &(&1.region_id == id))

      refute File.exists?(path)
    end
  end
end
