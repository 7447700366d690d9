"""Benchmarks: `python -m lora_ext bench`. Each reports time, throughput, the ceiling measured in the
same run, and ratios to the peers installed here (a missing peer is skipped with a note)."""
