"""Integrations of ffa with training frameworks.

- :mod:`ffa.integrations.torchdistill`: registers ffa's losses and adapters with torchdistill's
  registries (importing it needs torchdistill; nothing here imports it eagerly).
"""
