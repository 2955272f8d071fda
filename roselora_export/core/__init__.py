"""The bottom layer, torch-free: dtype names, the safetensors header, atomic writes and locks, OS errors.

Depends on nothing in the package but `errors`; every other package may import it.
"""
