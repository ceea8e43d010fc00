"""An offline tokenizer for tiny models: a byte-level BPE trained on a built-in driving corpus.

Real runs load the model's own tokenizer; this exists so tests and the demo build complete processors with no hub.
Byte-level BPE can encode any text, so nothing a data set contains is out of vocabulary.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Words the synthetic data and DriveLM/DriveBench prompts use, so that the BPE merges make them short.
_CORPUS = """
What is the moving status of object? Please select the correct answer from the following options:
A. Going ahead. B. Turn left. C. Turn right. D. Stopped. Answer: The answer is
Predict the behavior of the ego vehicle. The ego vehicle is going straight, slightly steering to the left,
steering to the right, driving with normal speed, driving slowly, driving fast, not moving, stopped.
What actions could the ego vehicle take based on the object? Why take this action and what's the probability?
In this scenario, what are safe actions to take for the ego vehicle? keep going at the same speed;
decelerate gradually without braking; brake suddenly; brake gently to a stop; turn left; turn right;
change to the left lane; change to the right lane; accelerate and go ahead; stop; yield; wait.
What actions could lead to a collision with the object? Is it necessary for the ego vehicle to consider it?
What are the important objects in the current scene? Which cameras show a pedestrian, a cyclist, a car?
Will the object be in the moving direction of the ego vehicle? Yes. No. The probability is high, medium, low.
front front-left front-right back back-left back-right camera view image CAM_FRONT CAM_BACK_LEFT
red green yellow white black gray grey silver blue orange brown sedan SUV truck bus van pickup taxi
pedestrian cyclist bicycle motorcycle traffic light traffic sign stop sign crosswalk lane marking curb
intersection road sidewalk parking construction weather clear rain night daytime overcast
The traffic light ahead is red, so the ego vehicle must stop before the stop line.
A pedestrian is crossing on the crosswalk ahead, so the ego vehicle should yield and stop.
The road ahead is clear with no obstacles, so keeping the same speed is safe.
The vehicle ahead in the ego lane is slowing down; decelerate gradually to keep a safe distance.
You are a driving assistant. Look at the camera images and answer the question about the driving scene.
object counting shape circle square triangle how many colour of the
0 1 2 3 4 5 6 7 8 9 0.1234 0.5678 <c1,CAM_FRONT,0.5000,0.5000> <c2,CAM_BACK,0.2500,0.7500>
"""


def build_tokenizer(
    special_tokens: dict[str, str],
    *,
    chat_tokens: tuple[str, ...] = (),
    pad_token: str,
    eos_token: str,
    vocab_size: int = 1024,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE and wrap it for a processor.

    ``special_tokens`` maps the attribute names processors read (``image_token``, ``vision_start_token``, ...) to the
    token strings; they become named special tokens so ``tokenizer.image_token_id`` etc. resolve.
    """
    specials = list(dict.fromkeys([pad_token, eos_token, *chat_tokens, *special_tokens.values()]))
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=pad_token,
        eos_token=eos_token,
        extra_special_tokens=special_tokens,
        chat_template=chat_template,
        model_max_length=32768,
    )
