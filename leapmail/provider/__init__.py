"""The provider side: the sync endpoint devices replicate their documents through.

- :mod:`leapmail.provider.storage`: the one storage interface
  (:class:`~leapmail.provider.storage.IProviderStorage`) and what it shares between
  its two implementations, :mod:`~leapmail.provider.sqlite` (the default) and
  :mod:`~leapmail.provider.postgres`;
- :mod:`leapmail.provider.api`: the HTTP API of ``docs/sync.rst`` on ``twisted.web``;
- :mod:`leapmail.provider.service`: ``twistd leapmail-provider``;
- :mod:`leapmail.provider.cli`: the ``leapmail-provider`` command (``adduser``).

Nothing here imports the client-side packages: the provider holds only ciphertext and
hashes, and never needs the code that makes them.
"""
