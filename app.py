"""The web demo of `conceptexpress serve` as a Hugging Face Space (Gradio SDK): `python app.py`.

The Space needs this file and a requirements.txt that installs the package with its web extra, e.g.
``diffusers-conceptexpress[web] @ git+https://github.com/OWNER/diffusers-conceptexpress`` (and a torch
build). It serves the shipped toy model, offline; set the Space variable CONCEPTEXPRESS_MODEL to a diffusers
model id or folder to serve that model instead (a GPU Space for a full-size Stable Diffusion model).
"""

import os

from diffusers_conceptexpress.web import WebDemo

demo = WebDemo(os.environ.get("CONCEPTEXPRESS_MODEL") or None)

if __name__ == "__main__":
    try:  # host and port None: Gradio's, i.e. the Space's GRADIO_SERVER_NAME and GRADIO_SERVER_PORT
        demo.launch(host=None, port=None)
    finally:
        demo.close()
