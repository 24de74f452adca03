"""The proxy: one asyncio I/O driver that protocol layers plug into."""
