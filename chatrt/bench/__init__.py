"""What `chatrt bench` and `chatrt loadtest` measure: reuse against recompute over a workload (`reuse`), sessions
answering at once (`concurrent`), simulated users over HTTP against the Python API (`loadtest`); the workload
presets (`workload`) and the report's plots (`plot`)."""
