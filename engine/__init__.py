"""How models run fast: prepacked multi-row kernels for the target's linear layers (and, as the room
grows, KV-cache layouts, graph-captured forwards and batching rows of many sessions into one).

Tensors and models in, logits out: no gRPC, no policy. The pure algorithm (`dyspec`) never
imports this room; the services and benchmarks do.
"""

# How linear layers run on a CPU (the services' --kernels): packed = weights packed once at load
# (engine.prepack), stock = torch's F.linear, auto = packed where the kernel builds and runs.
KERNELS = ("auto", "packed", "stock")
