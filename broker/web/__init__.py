"""What a browser opens on the broker: the home page, the API docs and the OHIF Viewer."""
