"""`ptutils ui`: a web dashboard over any store (see ptutils.ui.app)."""
