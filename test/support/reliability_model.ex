defmodule Snakepit.SharedMemory.ReliabilityModel do
  @moduledoc false
  # A proper_statem model of the region lifecycle (test/reliability/model_property_test.exs):
  # allocate / map / unmap / write / read / seal / deallocate / owner death, against the
  # real manager. The model predicts every result; after every command the
  # postcondition also compares the whole observable state: which regions the registry
  # holds, their reference counts (the header's holds), their sealed flags.
  #
  # Owners are helper processes in slots 1..2 (an ETS table maps a slot to its current
  # pid); `kill_owner/1` kills one with Process.exit(pid, :kill) and puts a fresh one in
  # its slot. Every mapping is made by the process running the commands.

  alias Snakepit.SharedMemory
  alias Snakepit.SharedMemory.{Error, Manager, Mapping, Registry, ShmHelpers}

  @owners :snakepit_shm_reliability_owners
  @sizes [4096, 8192, 70_000]

  # ---- set-up of a run ----

  @doc "Creates the owner slots (call before running commands)."
  def setup do
    if :ets.whereis(@owners) == :undefined,
      do: :ets.new(@owners, [:named_table, :public, :set])

    for slot <- 1..2, do: :ets.insert(@owners, {slot, spawn_owner()})
    :ok
  end

  @doc "Frees everything a run made and stops the owners."
  def teardown(state) do
    ids = Map.keys(state.regions) ++ state.dead
    {:ok, _} = SharedMemory.cleanup_regions(ids: Enum.filter(ids, &is_binary/1), orphans: false)
    for {_slot, pid} <- :ets.tab2list(@owners), do: Process.exit(pid, :kill)
    Manager.sync()
    :ok
  end

  defp spawn_owner, do: spawn(fn -> Process.sleep(:infinity) end)
  defp owner(slot), do: :ets.lookup_element(@owners, slot, 2)

  # ---- the commands (run by proper) ----

  def allocate(size, policy, slot) do
    case SharedMemory.allocate_region(size, cleanup_policy: policy, owner: owner(slot)) do
      {:ok, id} -> id
      {:error, %Error{reason: reason}} -> {:error, reason}
    end
  end

  def map(id, mode) do
    case SharedMemory.map_region(id, access_mode: mode) do
      {:ok, mapping} -> mapping
      {:error, %Error{reason: reason}} -> {:error, reason}
    end
  end

  def unmap(mapping), do: simple(SharedMemory.unmap_region(mapping))
  def write(mapping, offset, data), do: simple(SharedMemory.write(mapping, offset, data))
  def seal(id), do: simple(SharedMemory.seal(id))
  def deallocate(id), do: simple(SharedMemory.deallocate_region(id))

  def read(mapping, offset, length) do
    case SharedMemory.read(mapping, offset, length) do
      {:ok, data} -> {:ok, :binary.copy(data)}
      {:error, %Error{reason: reason}} -> {:error, reason}
    end
  end

  @doc "Kills the owner of `slot` and waits until the manager has handled its death."
  def kill_owner(slot) do
    pid = owner(slot)
    ref = Process.monitor(pid)
    Process.exit(pid, :kill)

    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    end

    :ets.insert(@owners, {slot, spawn_owner()})
    # The NIF's owner monitor and the caller monitor both reach the manager; sync twice
    # so that a message sent while the first sync ran is handled too.
    Manager.sync()
    Manager.sync()
    :ok
  end

  defp simple(:ok), do: :ok
  defp simple({:error, %Error{reason: reason}}), do: {:error, reason}

  # ---- proper_statem callbacks ----

  def initial_state, do: %{regions: %{}, dead: [], mappings: []}

  def command(state) do
    live = Map.keys(state.regions)
    known = live ++ state.dead

    types().frequency(
      [
        {3,
         {:call, __MODULE__, :allocate,
          [
            elements(@sizes),
            elements([:automatic, :manual, :reference_counted]),
            elements([1, 2])
          ]}}
      ] ++
        if(known == [],
          do: [],
          else: [
            {4,
             {:call, __MODULE__, :map, [elements(known), elements([:read_write, :read_only])]}},
            {1, {:call, __MODULE__, :seal, [elements(known)]}},
            {1, {:call, __MODULE__, :deallocate, [elements(known)]}},
            {1, {:call, __MODULE__, :kill_owner, [elements([1, 2])]}}
          ]
        ) ++
        if(state.mappings == [],
          do: [],
          else: [
            {2, {:call, __MODULE__, :unmap, [mapping_of(state)]}},
            {3,
             {:call, __MODULE__, :write, [mapping_of(state), types().integer(0, 4000), data()]}},
            {3,
             {:call, __MODULE__, :read,
              [mapping_of(state), types().integer(0, 4000), types().integer(0, 96)]}}
          ]
        )
    )
  end

  defp elements(list), do: types().elements(list)

  # PropEr is on the code path only once the test added it: no compile-time reference.
  defp types, do: :proper_types
  defp mapping_of(state), do: elements(Enum.map(state.mappings, & &1.m))
  defp data, do: types().elements([<<1, 2, 3>>, "model", :binary.copy(<<0xAB>>, 64), "x"])

  def precondition(state, {:call, _, :unmap, [m]}), do: known_mapping?(state, m)
  def precondition(state, {:call, _, :write, [m, _, _]}), do: known_mapping?(state, m)
  def precondition(state, {:call, _, :read, [m, _, _]}), do: known_mapping?(state, m)

  def precondition(state, {:call, _, f, [id | _]}) when f in [:map, :seal, :deallocate],
    do: Map.has_key?(state.regions, id) or id in state.dead

  def precondition(_state, _call), do: true

  defp known_mapping?(state, m), do: Enum.any?(state.mappings, &(&1.m == m))

  # ---- what the model predicts ----

  @doc "The result the model expects for `call` in `state`."
  def expected(state, {:call, _, :allocate, _}), do: {:id, state}
  def expected(state, {:call, _, :map, [id, mode]}), do: map_result(state.regions[id], mode)

  def expected(state, {:call, _, :seal, [id]}),
    do: if(state.regions[id], do: :ok, else: {:error, :not_found})

  def expected(state, {:call, _, :deallocate, [id]}),
    do: if(state.regions[id], do: :ok, else: {:error, :not_found})

  def expected(_state, {:call, _, :kill_owner, _}), do: :ok

  def expected(state, {:call, _, :unmap, [m]}),
    do: if(mapping(state, m).alive, do: :ok, else: {:error, :closed})

  def expected(state, {:call, _, :write, [m, offset, data]}) do
    mp = mapping(state, m)
    region = state.regions[mp.id]

    cond do
      not mp.alive -> {:error, :closed}
      offset + byte_size(data) > region.size -> {:error, :out_of_bounds}
      mp.mode == :read_only -> {:error, :permission_denied}
      region.sealed -> {:error, :sealed}
      true -> :ok
    end
  end

  def expected(state, {:call, _, :read, [m, offset, length]}) do
    mp = mapping(state, m)

    cond do
      not mp.alive -> {:error, :closed}
      true -> {:ok, binary_part(state.regions[mp.id].content, offset, length)}
    end
  end

  defp map_result(nil, _mode), do: {:error, :not_found}
  defp map_result(%{sealed: true}, :read_write), do: {:error, :sealed}
  defp map_result(_region, _mode), do: :mapping

  defp mapping(state, m), do: Enum.find(state.mappings, &(&1.m == m))

  def next_state(state, result, {:call, _, :allocate, [size, policy, slot]}) do
    region = %{
      size: size,
      policy: policy,
      slot: slot,
      sealed: false,
      held: false,
      content: <<0::size(size)-unit(8)>>
    }

    %{state | regions: Map.put(state.regions, result, region)}
  end

  def next_state(state, result, {:call, _, :map, [id, mode]} = call) do
    if expected(state, call) == :mapping do
      state = update_region(state, id, &%{&1 | held: true})
      %{state | mappings: state.mappings ++ [%{m: result, id: id, mode: mode, alive: true}]}
    else
      state
    end
  end

  def next_state(state, _result, {:call, _, :unmap, [m]}) do
    mp = mapping(state, m)

    if mp.alive do
      state = put_mapping(state, %{mp | alive: false})
      region = state.regions[mp.id]

      if region.policy == :reference_counted and holds(state, mp.id) == 0,
        do: free(state, mp.id),
        else: state
    else
      state
    end
  end

  def next_state(state, _result, {:call, _, :write, [m, offset, data]} = call) do
    if expected(state, call) == :ok do
      id = mapping(state, m).id

      update_region(state, id, fn r ->
        %{
          r
          | content:
              binary_part(r.content, 0, offset) <>
                data <>
                binary_part(
                  r.content,
                  offset + byte_size(data),
                  r.size - offset - byte_size(data)
                )
        }
      end)
    else
      state
    end
  end

  def next_state(state, _result, {:call, _, :seal, [id]}),
    do: update_region(state, id, &%{&1 | sealed: true})

  def next_state(state, _result, {:call, _, :deallocate, [id]}), do: free(state, id)

  def next_state(state, _result, {:call, _, :kill_owner, [slot]}) do
    Enum.reduce(state.regions, state, fn {id, region}, acc ->
      cond do
        region.slot != slot -> acc
        region.policy == :automatic -> free(acc, id)
        region.policy == :reference_counted and holds(acc, id) == 0 -> free(acc, id)
        # The region outlives its owner: it has no owner any more (a later owner in the
        # same slot is another process).
        true -> update_region(acc, id, &%{&1 | slot: nil})
      end
    end)
  end

  def next_state(state, _result, _call), do: state

  defp update_region(state, id, fun) do
    case state.regions do
      %{^id => region} -> %{state | regions: Map.put(state.regions, id, fun.(region))}
      _ -> state
    end
  end

  defp put_mapping(state, mp),
    do: %{state | mappings: Enum.map(state.mappings, &if(&1.m == mp.m, do: mp, else: &1))}

  defp holds(state, id), do: Enum.count(state.mappings, &(&1.alive and &1.id == id))

  defp free(state, id) do
    mappings = Enum.map(state.mappings, &if(&1.id == id, do: %{&1 | alive: false}, else: &1))
    %{state | regions: Map.delete(state.regions, id), dead: [id | state.dead], mappings: mappings}
  end

  # ---- postcondition: the result, then the whole observable state ----

  def postcondition(state, call, result) do
    result_ok?(expected(state, call), result) and observed_ok?(next_state(state, result, call))
  end

  defp result_ok?({:id, _}, result),
    do: is_binary(result) and String.starts_with?(result, "spshm_")

  defp result_ok?(:mapping, result), do: match?(%Mapping{}, result)
  defp result_ok?({:error, :closed}, {:error, reason}), do: reason in [:closed, :deallocated]
  defp result_ok?(expected, result), do: expected == result

  defp observed_ok?(model) do
    live = for id <- Map.keys(model.regions), do: {id, observe(id)}

    Enum.all?(live, fn {id, observed} ->
      region = model.regions[id]
      observed == {:live, holds(model, id), region.sealed}
    end) and Enum.all?(model.dead, &(observe(&1) == :gone))
  end

  defp observe(id) do
    case {Registry.lookup(id), SharedMemory.get_region_info(id)} do
      {nil, {:error, %Error{reason: :not_found}}} -> :gone
      {_record, {:ok, info}} -> {:live, info.reference_count, info.sealed}
      other -> {:inconsistent, other}
    end
  end

  @doc "Describes the disagreement after a failed run (for the failure message)."
  def explain(state) do
    for {id, region} <- state.regions do
      "#{id}: model holds #{holds(state, id)} sealed #{region.sealed} policy #{region.policy}, real #{inspect(observe(id))}"
    end ++
      for(
        id <- state.dead,
        observe(id) != :gone,
        do: "#{id}: model freed, real #{inspect(observe(id))}"
      )
  end

  @doc "Segments of ours in /dev/shm (for the final check of the suite)."
  def segments, do: ShmHelpers.our_segments()
end
