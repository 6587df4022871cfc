"""Evidence that holds up: a signed ledger (``report --sign``, ``ledger keygen|verify``) and a
byte-exact export of the stored mail (``export``).

The reconciliation report is the proof that nothing was lost, but a plain CSV can be edited by
anyone who holds it. :mod:`.ledger` chains every row into a SHA-256 hash chain and signs a
manifest of it with an Ed25519 key, so a third party can check, without mxspool, that the file
they hold is the one mxspool wrote; :mod:`.verify` is that check. :mod:`.export` writes the
messages themselves (mboxrd or a ZIP of ``.eml`` files) for an archive or a legal hold.
"""
