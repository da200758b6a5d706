"""Architecture declarations: what pagoda knows about each model family without torch."""
