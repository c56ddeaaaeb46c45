"""Media: every mp4 write and every frame read, sample and resize of the project (see ``media.video``)."""
