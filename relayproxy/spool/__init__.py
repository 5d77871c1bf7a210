"""The opt-in durable spool: messages taken on disk and delivered later."""
