"""Models: GroupMSA and SNN gene encoders, the Nystrom patch aggregator, GiMP, heads."""

__all__: list[str] = []
