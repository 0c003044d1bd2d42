"""Pictures and pages: image grids with boxes (and, later, plots and the HTML report)."""
