"""The DarkMatter conformance suite: the mesh protocol (docs/protocol.md §4–§6, §10, §13) as black-box
cases that hold whatever transport carries it. Run it as

    pytest --pyargs darkmatter.testing.conformance --dm-transport=memory|http|webrtc

A third-party transport re-runs it against itself (see ``darkmatter.testing.harness``).
"""
