"""Memory: bytes measured (held tensors, allocator peaks) and modeled (closed form)."""
