using System.Buffers.Binary;
using System.Text;

namespace AnyPrecML.Models;

/// <summary>
/// llama2.c's tokenizer.bin (int32 max_token_length, then per token: float32 score, int32 length, that many UTF-8
/// bytes) turned back into the SentencePiece BPE model it was exported from, built in memory as a ModelProto, so
/// one loader (Microsoft.ML.Tokenizers) serves both files and a converted model carries a real tokenizer.model.
/// </summary>
/// <remarks>
/// llama2.c's export wrote every SentencePiece piece with '▁' replaced by ' ', and BOS/EOS as "\n&lt;s&gt;\n" and
/// "\n&lt;/s&gt;\n"; this undoes both. What the export dropped is taken from llama2.c's own encoder (run.c), which
/// the file was made for: &lt;unk&gt; at 0, BOS 1 and EOS 2 (run.c hardcodes them), pieces "&lt;0xHH&gt;" are byte
/// fallback, a dummy-prefix space is added, and runs of spaces are kept (SentencePiece's remove_extra_whitespaces
/// off, as in Llama 2's tokenizer.model; a model trained with SentencePiece's default would collapse them).
/// </remarks>
public static class Llama2cTokenizerFile
{
    /// <summary>True for a llama2.c tokenizer file (named *.bin); anything else is read as a SentencePiece tokenizer.model.</summary>
    public static bool IsLlama2c(string path) => path.EndsWith(".bin", StringComparison.OrdinalIgnoreCase);

    /// <summary>The pieces and scores of a tokenizer.bin, in id order, as the file spells them.</summary>
    /// <exception cref="ModelFormatException">The file is truncated or its lengths do not fit.</exception>
    public static IReadOnlyList<(string Piece, float Score)> Read(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"Tokenizer '{path}' does not exist.", path);
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length < 4) throw new ModelFormatException($"{path}: {bytes.Length} bytes is too short for a llama2.c tokenizer (int32 max_token_length first).");
        int maxLength = BinaryPrimitives.ReadInt32LittleEndian(bytes);
        if (maxLength <= 0) throw new ModelFormatException($"{path}: max_token_length {maxLength} must be positive; this is not a llama2.c tokenizer.");
        var pieces = new List<(string, float)>();
        var utf8 = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);
        for (int at = 4; at < bytes.Length;)
        {
            int id = pieces.Count;
            if (bytes.Length - at < 8) throw new ModelFormatException($"{path}: truncated at token {id} (offset {at}): score and length need 8 bytes, {bytes.Length - at} remain.");
            float score = BinaryPrimitives.ReadSingleLittleEndian(bytes.AsSpan(at));
            int length = BinaryPrimitives.ReadInt32LittleEndian(bytes.AsSpan(at + 4));
            at += 8;
            if (length <= 0 || length > maxLength) throw new ModelFormatException($"{path}: token {id} has length {length}, outside 1..{maxLength} (max_token_length).");
            if (length > bytes.Length - at) throw new ModelFormatException($"{path}: truncated at token {id}: it needs {length} bytes, {bytes.Length - at} remain.");
            if (!float.IsFinite(score)) throw new ModelFormatException($"{path}: token {id} has a non-finite score.");
            string piece;
            try { piece = utf8.GetString(bytes, at, length); }
            catch (DecoderFallbackException) { throw new ModelFormatException($"{path}: token {id} is not valid UTF-8."); }
            pieces.Add((piece, score));
            at += length;
        }
        if (pieces.Count < 3) throw new ModelFormatException($"{path}: {pieces.Count} tokens; a llama2.c tokenizer has at least <unk>, BOS and EOS.");
        return pieces;
    }

    /// <summary>The SentencePiece ModelProto (tokenizer.model bytes) equivalent to the tokenizer.bin at <paramref name="path"/>.</summary>
    public static byte[] ToSentencePieceModel(string path)
    {
        var pieces = Read(path);
        const int Unk = 0, Bos = 1, Eos = 2;
        var model = new ProtoWriter();
        bool byteFallback = false;
        for (int id = 0; id < pieces.Count; id++)
        {
            var (text, score) = pieces[id];
            // SentencePiece piece types: 1 normal (the default, not written), 2 unknown, 3 control, 6 byte.
            int type = id == Unk ? 2 : id is Bos or Eos ? 3 : IsBytePiece(text) ? 6 : 1;
            byteFallback |= type == 6;
            string piece = type == 3 ? text.Trim('\n') : type == 1 ? text.Replace(' ', '\u2581') : text;
            var entry = new ProtoWriter();
            entry.String(1, piece);
            entry.Float(2, score);
            if (type != 1) entry.Varint(3, (ulong)type);
            model.Message(1, entry);
        }
        var trainer = new ProtoWriter();
        trainer.Varint(3, 2);                        // model_type: BPE
        trainer.Varint(4, (ulong)pieces.Count);      // vocab_size
        trainer.Varint(35, byteFallback ? 1UL : 0);  // byte_fallback
        trainer.Varint(40, Unk);
        trainer.Varint(41, Bos);
        trainer.Varint(42, Eos);
        model.Message(2, trainer);
        var normalizer = new ProtoWriter();
        normalizer.String(1, "identity");
        normalizer.Varint(3, 1);                     // add_dummy_prefix
        normalizer.Varint(4, 0);                     // remove_extra_whitespaces: off, as run.c
        normalizer.Varint(5, 1);                     // escape_whitespaces
        model.Message(3, normalizer);
        return model.ToArray();
    }

    /// <summary>Writes the tokenizer at <paramref name="tokenizerPath"/> to <paramref name="destination"/> as a SentencePiece tokenizer.model (converted from tokenizer.bin, copied otherwise).</summary>
    public static void CopyAsSentencePieceModel(string tokenizerPath, string destination)
    {
        if (IsLlama2c(tokenizerPath)) File.WriteAllBytes(destination, ToSentencePieceModel(tokenizerPath));
        else File.Copy(tokenizerPath, destination);
    }

    private static bool IsBytePiece(string s) => s.Length == 6 && s.StartsWith("<0x", StringComparison.Ordinal) && s[5] == '>' && Uri.IsHexDigit(s[3]) && Uri.IsHexDigit(s[4]);

    /// <summary>The few protobuf wire encodings a ModelProto needs: varints, fixed32 floats, length-delimited fields.</summary>
    private sealed class ProtoWriter
    {
        private readonly MemoryStream _bytes = new();

        public void Varint(int field, ulong value) { Tag(field, 0); Raw(value); }

        public void Float(int field, float value)
        {
            Tag(field, 5);
            Span<byte> b = stackalloc byte[4];
            BinaryPrimitives.WriteSingleLittleEndian(b, value);
            _bytes.Write(b);
        }

        public void String(int field, string value) => Bytes(field, Encoding.UTF8.GetBytes(value));
        public void Message(int field, ProtoWriter message) => Bytes(field, message.ToArray());
        public byte[] ToArray() => _bytes.ToArray();

        private void Bytes(int field, byte[] value) { Tag(field, 2); Raw((ulong)value.Length); _bytes.Write(value); }
        private void Tag(int field, int wireType) => Raw(((ulong)field << 3) | (uint)wireType);

        private void Raw(ulong v)
        {
            for (; v >= 0x80; v >>= 7) _bytes.WriteByte((byte)(v | 0x80));
            _bytes.WriteByte((byte)v);
        }
    }
}
