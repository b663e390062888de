"""maskfl.protocol: the sans-IO core of Xaynet's PET masked aggregation.

Bytes and values in, events and bytes out: no asyncio, no files, no clock read
inside (the time is passed in), and fresh randomness only where a function says so
(``crypto.new_seed``, ``EphemeralKeyPair.generate``), so a round replays byte for byte
once its seeds and keys are given.
The public API is the modules themselves:

* :mod:`~maskfl.protocol.ids` (``RoundId``, ``DeviceId``, ``FleetId``, ``Role``) and
  :mod:`~maskfl.protocol.errors` (the one exception tree and its ``Reason`` codes);
* :mod:`~maskfl.protocol.masking` (fixed-point encoding, ChaCha20 mask streams),
  :mod:`~maskfl.protocol.crypto` (seeds, X25519 sealing, digests),
  :mod:`~maskfl.protocol.sortition` (round seeds, tickets, task selection),
  :mod:`~maskfl.protocol.phases` (phases, transitions, the count/time window);
* :mod:`~maskfl.protocol.identity` (enrollment certificates, revocation lists),
  :mod:`~maskfl.protocol.keys` (Ed25519 keys as PEM bytes);
* :mod:`~maskfl.protocol.messages` (the signed wire format),
  :mod:`~maskfl.protocol.chunking` (splitting and reassembling large payloads) and
  :mod:`~maskfl.protocol.topics` (the MQTT topic tree).

Nothing is imported here, so importing one module does not load the others.
"""

__all__: list[str] = []
