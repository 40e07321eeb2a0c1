"""The inference core: image bytes -> top-k, shared by training's evaluation, export's verification
and the TorchServe handler.

One concept per module:

* ``images``      -- reading and decoding image bytes (header check first, EXIF orientation)
* ``containers``  -- the segments of a JPEG/PNG/GIF, counted before Pillow reads them in Python
* ``tiff_ifds``   -- the directories of a TIFF (tags, fractions, strips), counted likewise
* ``image_errors`` -- the errors an image raises, with their HTTP statuses (400, 413, 415, 500)
* ``admission``   -- what a request and a batch may cost in decoded pixels, from the headers alone
* ``jpeg``        -- JPEG specifics: reduced DCT decoding, the batched (GPU) decoder, EXIF orientation
* ``transforms``  -- the evaluation transform (resize + center crop on uint8) and ``normalize``
* ``tta``         -- test-time augmentation views, their aggregation and adaptive gating
* ``class_index`` -- the ``index_to_name.json`` file (and the model card's name)
* ``backends``    -- the runtimes (TorchScript, ONNX Runtime, OpenVINO; imported lazily)
* ``signal_stack`` -- the thread's signal alternate stack, kept valid across OpenVINO's CPU plugin
* ``settings``    -- every key of ``model-config.yaml``, its default, type and allowed values
* ``requests``    -- reading one request of a batch (raw, JSON/base64, multipart, compressed) and its top-k
* ``protocols``   -- which protocol a request speaks (TorchServe's, KServe v1, OIP) and its answer
* ``oip``         -- the Open Inference Protocol's tensors, binary and classification extensions
* ``responses``   -- top-k answers with class names and confidences, JSON error bodies
* ``explain``     -- occlusion explanations through any backend, and their overlay PNG
* ``explain_requests`` -- one explanation request's options, limits and answer in its protocol
* ``batch``       -- what one TorchServe batch carries between the handler's stages
* ``threads``     -- threads per worker, following the model's live workers
* ``metrics``     -- the handler's metrics: names, types (histograms, gauges), units, values
* ``cli``         -- how every command line ends on a user's mistake (one line, exit status 2)
* ``atomic``      -- crash-safe replacement of files and folders (checkpoints, graphs, archives)
* ``image_files`` -- which files are images, and the image files under a folder (standard library only)

It imports only torch, torchvision, Pillow and numpy (and the runtimes lazily), never ``training``,
``export`` or ``handlers``. The ``.mar`` archive carries this folder as a package, so the handler
imports it exactly as in the repository.
"""
