"""Per-format contracts shared by an exporter and its runtime: file names, the versioned config
schema, graph input/output names. An exporter writes what these modules declare and a runtime reads
it through them, so neither restates the other's knowledge (and no runtime imports an exporter)."""
