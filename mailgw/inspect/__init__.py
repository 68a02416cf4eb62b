"""Content inspection [4.9]: what an inspecting session checks each message with.

- L{mailgw.inspect.service}: the profiles of a configuration, their clamd clients, a
  stage per inspected session, the log event and metrics of each verdict.
- L{mailgw.inspect.stage}: what the stages share (holding a side, flow-controlled
  replay); L{mailgw.inspect.pop3}, L{mailgw.inspect.imap4}, L{mailgw.inspect.smtp}:
  the stage of each protocol.
- L{mailgw.inspect.check}: one message's inspection and its verdict;
  L{mailgw.inspect.spool}: where it waits (memory, then a private file).
- L{mailgw.inspect.mime} (with L{mailgw.inspect.mimeparams}): the streaming MIME walk
  and rewrite; L{mailgw.inspect.clamd}: a Twisted client of clamd's C{zINSTREAM}, fed
  while the message arrives; L{mailgw.inspect.notice}: what stands for a withheld
  message.
"""
