"""The SMTP intake: asyncio listener, connection limits, relay policy, streaming to the store."""
