"""Interactive chat for `lamina chat`: streaming replies, /reset, /exit, Ctrl-C and Ctrl-D."""

from __future__ import annotations

import sys
from typing import TextIO

from engine.api import LLM, TextStream
from engine.errors import ContextLengthError, LaminaError
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams

HELP = (
    "Type a message. /reset clears the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply."
)


class ChatSession:
    def __init__(
        self,
        llm: LLM,
        params: SamplingParams,
        system: str | None = None,
        out: TextIO = sys.stdout,
    ) -> None:
        self.llm = llm
        self.params = params
        self.system = system
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
            print(HELP, file=self.out)
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                print(file=self.out)
                return
            except KeyboardInterrupt:
                print(file=self.out)
                continue
            command = line.strip()
            if command == "/exit":
                return
            if command == "/reset":
                self.reset()
                print("(conversation cleared)", file=self.out)
                continue
            if command:
                self.reply(line)

    def reply(self, user_text: str) -> str:
        """Stream the model's answer to `user_text`; Ctrl-C keeps what was said so far.

        When the conversation no longer fits the context window, the oldest exchanges (never
        the system prompt) are dropped until it does; a message too long on its own is refused
        with a one-line notice and the chat goes on.
        """
        self.messages.append({"role": "user", "content": user_text})
        stream = self._start_reply()
        if stream is None:
            return ""
        if stream.write_to(self.out):
            self.out.write(" [stopped]")
        if _hit_context_end(stream.output, self.llm.max_model_len):
            self.out.write(" [context full: the oldest turns will be dropped]")
        self.out.write("\n")
        self.messages.append({"role": "assistant", "content": stream.output.text})
        return stream.output.text

    def _start_reply(self) -> TextStream | None:
        first_turn = 1 if self.system else 0
        while True:
            try:
                return self.llm.stream_chat(self.messages, self.params)
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
