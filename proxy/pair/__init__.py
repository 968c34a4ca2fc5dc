"""The local pair: base model B and unlearned model U = B + offset, their files (packaged
models, offset artifacts), the batched forward, the prefix cache and the pair scorer.

May import: :mod:`proxy.common`, :mod:`proxy.decoding`, :mod:`adapters.base`,
:mod:`adapters.templates`, torch, transformers, peft. Not :mod:`proxy.server`, :mod:`proxy.training`."""
