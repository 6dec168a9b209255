"""transfer: distributed transfer learning on images with Ray Train and MultiWorkerMirroredStrategy."""

import os

# Keras 3 breaks model.fit under MultiWorkerMirroredStrategy (keras-team/keras#20585): use tf-keras.
# This must be set before TensorFlow resolves tf.keras, in the driver and in every Ray worker.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
