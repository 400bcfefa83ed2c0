"""Dense-retriever knowledge acquisition: layer-wise probes and neuron attribution."""
