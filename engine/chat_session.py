"""Interactive chat for `lamina chat`: streaming replies, slash commands, Ctrl-C and Ctrl-D."""

from __future__ import annotations

import re
import sys
from typing import TextIO

from engine.api import LLM, TextStream
from engine.errors import ContextLengthError, LaminaError
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.text_input import check_text

COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the conversation (the system prompt stays)",
    "/exit": "leave (as does Ctrl-D)",
}
GREETING = "Type a message. /help lists the commands; Ctrl-C stops a reply, Ctrl-D leaves."
HELP = "\n".join(f"{name:<7} {text}" for name, text in COMMANDS.items())
# A line is a command when its first word is a slash and letters ("/usr/bin ..." is a message).
_COMMAND = re.compile(r"/[A-Za-z]+")


class ChatSession:
    def __init__(
        self,
        llm: LLM,
        params: SamplingParams,
        system: str | None = None,
        out: TextIO = sys.stdout,
        template_kwargs: dict | None = None,
    ) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.template_kwargs = template_kwargs or {}  # chat template variables (enable_thinking)
        self.out = out
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def run(self) -> None:
        """Read lines until /exit or end of input; each line gets a streamed reply."""
        interactive = sys.stdin.isatty()
        if interactive:
            _enable_line_editing()
            print(GREETING, file=self.out)
        while True:
            try:
                line = input(">>> " if interactive else "")
                check_text(line, "the message")
            except EOFError:
                print(file=self.out)
                return
            except KeyboardInterrupt:
                print(file=self.out)
                continue
            except UnicodeDecodeError:  # stdin decodes strictly in a UTF-8 locale
                print("error: the message is not valid UTF-8 text", file=self.out)
                continue
            except LaminaError as exc:
                print(f"error: {exc}", file=self.out)
                continue
            words = line.split(maxsplit=1)
            if words and _COMMAND.fullmatch(words[0]):
                if self.command(words[0]):
                    return
            elif words:
                self.reply(line)

    def command(self, name: str) -> bool:
        """Run a slash command; True when the chat should end. Unknown ones are refused here
        rather than sent to the model as a message."""
        if name == "/exit":
            return True
        if name == "/reset":
            self.reset()
            print("(conversation cleared)", file=self.out)
        elif name == "/help":
            print(HELP, file=self.out)
        else:
            print(f"unknown command {name} (/help lists them)", file=self.out)
        return False

    def reply(self, user_text: str) -> str:
        """Stream the model's answer to `user_text` and add the exchange to the conversation.

        A reply stopped with Ctrl-C, or failed in the engine, is left out of the conversation
        with its message (as vLLM and llama.cpp do), so the next turn does not build on a
        fragment. When the conversation no longer fits the context window, the oldest
        exchanges (never the system prompt) are dropped until it does; a message too long on
        its own is refused with a one-line notice and the chat goes on.
        """
        self.messages.append({"role": "user", "content": user_text})
        stream = self._start_reply()
        if stream is None:
            return ""
        stopped = stream.write_to(self.out)
        output = stream.output
        if stopped:
            self.out.write(" [stopped; left out of the conversation]")
        elif output.finish_reason == "error":
            self.out.write(f"\nerror: {output.error}")
        elif _hit_context_end(output, self.llm.max_model_len):
            self.out.write(" [context full: the oldest turns will be dropped]")
        self.out.write("\n")
        if stopped or output.finish_reason == "error":
            self.messages.pop()
            return ""
        self.messages.append({"role": "assistant", "content": output.text})
        return output.text

    def _start_reply(self) -> TextStream | None:
        first_turn = 1 if self.system else 0
        while True:
            try:
                return self.llm.stream_chat(self.messages, self.params, **self.template_kwargs)
            except ContextLengthError as exc:
                if len(self.messages) - first_turn <= 1:
                    self.messages.pop()
                    print(f"error: {exc}", file=self.out)
                    return None
                del self.messages[first_turn : first_turn + 2]  # oldest user+assistant pair
                print("(oldest turn dropped to fit the context window)", file=self.out)
            except LaminaError as exc:
                self.messages.pop()
                print(f"error: {exc}", file=self.out)
                return None


def _hit_context_end(output: RequestOutput, max_model_len: int) -> bool:
    used = len(output.prompt_token_ids) + len(output.token_ids)
    return output.finish_reason == "length" and used >= max_model_len


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (importing it gives input() history and editing)
    except ImportError:
        pass
