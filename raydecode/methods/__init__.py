"""One module per method (MindEye2, Duala, Dynadiff, MindLink, CLIP-MUSED): model, losses and its
MethodSpec. Nothing about Ray in here (see DESIGN.md, "MethodSpec")."""
