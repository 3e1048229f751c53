"""What the client and the worker share: settings, secrets, safe document loading.

Nothing here imports ``client`` or ``workers``; both import from here.
"""
