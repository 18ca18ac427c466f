"""Speed and memory benchmarks (`archbench bench`); the record fields are documented in
`archbench.evaluate.bench.runner`."""
