"""The project's own sinks, one backend per module. Each registers under its
``report_to`` name in the ``eventbus.sinks`` entry-point group and imports its SDK
lazily, so importing this package imports no backend."""

__all__: list[str] = []
