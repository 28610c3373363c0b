# Makes conf/ the package `async_batching.conf` when installed, so other Hydra apps can add
# `hydra.searchpath=[pkg://async_batching.conf]` and use these config groups.
