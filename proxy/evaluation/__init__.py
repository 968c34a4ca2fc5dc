"""The unlearning audit and its metrics (open-unlearning definitions: forget quality,
model utility, truth ratio, ROUGE-L).

May import: :mod:`proxy.common`, :mod:`proxy.decoding`, :mod:`proxy.pair`, :mod:`proxy.jobs`,
:mod:`adapters`. Not :mod:`proxy.server`, :mod:`proxy.training`."""
