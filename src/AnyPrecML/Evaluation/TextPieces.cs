using System.Text;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Evaluation;

/// <summary>
/// Cuts a text into pieces of at most <see cref="MaxChars"/> characters that tokenize, one after another, to the tokens of
/// the whole: so a 50 MB line costs the tokenizer one piece of memory, not tens of bytes per character at once.
/// </summary>
/// <remarks>
/// A piece ends only at a single space between two non-space characters ("x y"). SentencePiece (Llama) splits at
/// whitespace before merging, so no token spans that space, and its dummy prefix turns the next piece's start "y" back
/// into "▁y": the space is dropped there. For other tokenizers the space starts the next piece, as their
/// pre-tokenizers attach it to the following word. A run of <see cref="MaxChars"/> characters without such a space
/// (one giant word, text without spaces) in a piece's second half is cut where it reaches the limit, never inside a surrogate pair; only there
/// may tokens differ from the whole line's (one word boundary more per <see cref="MaxChars"/> characters).
/// </remarks>
public static class TextPieces
{
    /// <summary>Characters per piece at most: 64 Ki (≈ 128 KiB of text and a few MiB of tokenizer state).</summary>
    public const int MaxChars = 1 << 16;

    /// <summary>
    /// The pieces of <paramref name="reader"/>'s text; with <paramref name="splitLines"/> a piece never spans a '\n' (which
    /// is not returned) and EndsLine marks the last piece of each line (an empty line is one empty piece).
    /// </summary>
    public static IEnumerable<(string Text, bool EndsLine)> Read(TextReader reader, Tokenizer tokenizer, bool splitLines, int maxChars = MaxChars)
    {
        ArgumentNullException.ThrowIfNull(reader);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxChars, 4);
        bool dropSpace = tokenizer is SentencePieceTokenizer { AddDummyPrefix: true, EscapeWhiteSpaces: true, TreatWhitespaceAsSuffix: false };
        var block = new char[8192];
        var piece = new StringBuilder();
        bool pending = false; // a line has begun and not yet been returned as ended
        int n;
        while ((n = reader.Read(block)) > 0)
        {
            for (int i = 0; i < n; i++)
            {
                char c = block[i];
                if (splitLines && c == '\n')
                {
                    yield return (piece.ToString(), true);
                    piece.Clear();
                    pending = false;
                    continue;
                }
                piece.Append(c);
                pending = true;
                if (piece.Length < maxChars) continue;
                int cut = SplitPoint(piece);
                if (cut > 0)
                {
                    yield return (piece.ToString(0, cut), false);
                    piece.Remove(0, dropSpace ? cut + 1 : cut);
                }
                else
                {
                    int at = char.IsHighSurrogate(piece[^1]) ? piece.Length - 1 : piece.Length;
                    yield return (piece.ToString(0, at), false);
                    piece.Remove(0, at);
                }
            }
        }
        if (pending && (splitLines || piece.Length > 0)) yield return (piece.ToString(), true);
    }

    /// <summary>
    /// The index of the last space with a non-whitespace character on each side, in the piece's second half (so what
    /// remains is under half a piece and the next search is that far away), or 0 when there is none.
    /// </summary>
    private static int SplitPoint(StringBuilder piece)
    {
        for (int i = piece.Length - 2; i > piece.Length / 2; i--)
            if (piece[i] == ' ' && !char.IsWhiteSpace(piece[i - 1]) && !char.IsWhiteSpace(piece[i + 1])) return i;
        return 0;
    }
}
