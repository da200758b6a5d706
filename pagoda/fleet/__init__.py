"""Several models behind one server: the models file (spec), the memory planner, device
memory queries, the ModelManager that loads, sleeps, wakes and evicts engines, and replica
routing."""
