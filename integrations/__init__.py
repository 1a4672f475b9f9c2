"""Host adapters: thin translators from each host's public contract to obs_plugins' core.

torch_prune  torch.nn.utils.prune BasePruningMethods (OBSIHT, ContinuousSparsification)
onnx         export + verification + ONNX Runtime latency per route
"""
