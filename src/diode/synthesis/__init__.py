"""DIODE synthesis: invert a detector into a labelled image set (METHOD.md sections 1-2)."""
