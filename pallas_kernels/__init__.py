"""Pallas GPU kernels, one op per file.

Each file has the same anatomy: the kernel (with a shape comment on every ref), a jitted entry
point with a static ``interpret`` flag, a frozen ``BlockSizes`` dataclass, and a pure-jnp
``*_reference`` the tests compare against. Kernels never import model code.
"""
