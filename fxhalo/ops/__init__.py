"""Functional domain-parallel kernels: pure functions of ``(tensors..., params..., domain)``.

The graph rewrite inserts calls to these functions, and the eager modules call
them too, so there is one implementation of each op.
"""
