"""Content inspection [4.9]: what an inspecting session checks each message with.

- L{mailgw.inspect.clamd}: a Twisted client of clamd's C{zINSTREAM}, fed while the
  message arrives.
"""
