using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using AnyPrecML.Models;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

/// <summary>llama2.c's tokenizer.bin read directly, against the SentencePiece models the same vocabularies ship as.</summary>
[TestClass]
public sealed class Llama2cTokenizerTests
{
    private static string Tok512Bin => TestData.Shared("models", "stories260K", "tok512.bin");

    [TestMethod]
    public void Tok512BinEncodesTheTinyStoriesSampleAsTok512ModelAndDecodesBack()
    {
        var fromBin = LlamaTokenizerLoader.Load(Tok512Bin);
        var fromModel = LlamaTokenizerLoader.Load(TestData.Tok512);
        Assert.AreEqual(fromModel.Vocabulary.Count, fromBin.Vocabulary.Count);
        string text = File.ReadAllText(TestData.TinyStories);
        var ids = fromBin.EncodeToIds(text);
        CollectionAssert.AreEqual(fromModel.EncodeToIds(text).ToArray(), ids.ToArray(), "the whole sample");
        Assert.IsGreaterThan(5000, ids.Count);
        Assert.AreEqual(text, fromBin.Decode(ids));
        foreach (var line in File.ReadLines(TestData.TinyStories))
        {
            var lineIds = fromBin.EncodeToIds(line);
            CollectionAssert.AreEqual(fromModel.EncodeToIds(line).ToArray(), lineIds.ToArray(), line[..Math.Min(40, line.Length)]);
            Assert.AreEqual(line, fromBin.Decode(lineIds));
        }
        // Bytes outside the vocabulary go through byte fallback in both.
        const string Rare = "Zoë ate 🍕 at 10:45 — ¿qué?";
        CollectionAssert.AreEqual(fromModel.EncodeToIds(Rare).ToArray(), fromBin.EncodeToIds(Rare).ToArray());
        Assert.AreEqual(Rare, fromBin.Decode(fromBin.EncodeToIds(Rare)));
        // Runs of spaces are kept, as llama2.c's run.c keeps them; tok512.model was trained with SentencePiece's
        // default remove_extra_whitespaces, which tokenizer.bin does not record, and collapses them.
        const string Spaced = "Once  upon   a time";
        Assert.AreEqual(Spaced, fromBin.Decode(fromBin.EncodeToIds(Spaced)));
        Assert.AreEqual("Once upon a time", fromModel.Decode(fromModel.EncodeToIds(Spaced)));
    }

    [TestMethod]
    public void ATokenizerBinExportedFromLlama2sModelEncodesAsThatModelAtFullVocabulary()
    {
        // llama2.c's export (tokenizer.py) applied to Llama 2's tokenizer.model: 32,000 pieces, the real vocabulary size.
        using var dir = TestData.NewTempDir();
        string model = TestData.Shared("models", "llama2-tokenizer", "tokenizer.model");
        WriteLlama2cExport(model, dir["tokenizer.bin"]);
        var fromBin = LlamaTokenizerLoader.Load(dir["tokenizer.bin"]);
        var fromModel = LlamaTokenizerLoader.Load(model);
        Assert.AreEqual(32000, fromBin.Vocabulary.Count);
        string text = string.Join('\n', File.ReadLines(TestData.Shared("data", "wikitext-2", "valid.txt")).Take(300));
        var ids = fromBin.EncodeToIds(text);
        CollectionAssert.AreEqual(fromModel.EncodeToIds(text).ToArray(), ids.ToArray());
        Assert.AreEqual(text, fromBin.Decode(ids));
    }

    [TestMethod]
    public void ALlama2cDirectoryWithOnlyTokenizerBinGeneratesAndConvertsToATokenizerModel()
    {
        using var dir = TestData.NewTempDir();
        Directory.CreateDirectory(dir["llama2c"]);
        File.Copy(TestData.Stories260K, dir["llama2c/stories260K.bin"]);
        File.Copy(Tok512Bin, dir["llama2c/tokenizer.bin"]);
        using (var cp = LlamaCheckpoint.Open(dir["llama2c/stories260K.bin"])) Assert.AreEqual(dir["llama2c/tokenizer.bin"], cp.TokenizerPath);

        var (code, output, err) = Cli.Run("generate", "--model", dir["llama2c/stories260K.bin"], "--max-tokens", "30", "--json");
        Assert.AreEqual(0, code, err);
        StringAssert.StartsWith(JsonDocument.Parse(output).RootElement.GetProperty("text").GetString(), "Once upon a time, there was a little girl named Lily.");

        // --tokenizer takes a tokenizer.bin too, and convert writes it as a SentencePiece tokenizer.model.
        (code, _, err) = Cli.Run("convert", "--model", TestData.Stories260K, "--tokenizer", Tok512Bin, "--output", dir["hf"]);
        Assert.AreEqual(0, code, err);
        var converted = LlamaTokenizerLoader.Load(dir["hf/tokenizer.model"]);
        string text = File.ReadAllText(TestData.TinyStories);
        CollectionAssert.AreEqual(LlamaTokenizerLoader.Load(TestData.Tok512).EncodeToIds(text).ToArray(), converted.EncodeToIds(text).ToArray());
    }

    [TestMethod]
    public void ABrokenTokenizerBinIsOneLineNamingTheFile()
    {
        using var dir = TestData.NewTempDir();
        var bytes = File.ReadAllBytes(Tok512Bin);
        File.WriteAllBytes(dir["truncated.bin"], bytes[..(bytes.Length - 3)]);
        var e = Assert.ThrowsExactly<ModelFormatException>(() => LlamaTokenizerLoader.Load(dir["truncated.bin"]));
        StringAssert.Contains(e.Message, "truncated at token 511");
        var lying = bytes.ToArray();
        BinaryPrimitives.WriteInt32LittleEndian(lying.AsSpan(8), 1000);   // token 0's length
        File.WriteAllBytes(dir["lying.bin"], lying);
        var (code, _, err) = Cli.Run("perplexity", "--model", TestData.Stories260K, "--tokenizer", dir["lying.bin"], "--text", TestData.TinyStories);
        Assert.AreEqual(2, code);
        Assert.AreEqual($"error: token 0 has length 1000, outside 1..7 (max_token_length) ({dir["lying.bin"]})", err.Trim());
    }

    /// <summary>
    /// What llama2.c's tokenizer.py writes for a SentencePiece model: max_token_length, then per piece its score, length
    /// and bytes, '▁' as ' ', BOS and EOS as "\n&lt;s&gt;\n" and "\n&lt;/s&gt;\n". Reads the ModelProto's pieces itself.
    /// </summary>
    private static void WriteLlama2cExport(string modelPath, string binPath)
    {
        var pieces = new List<(byte[] Bytes, float Score)>();
        var proto = File.ReadAllBytes(modelPath);
        for (int at = 0; at < proto.Length;)
        {
            var (field, wire) = Tag(proto, ref at);
            if (wire != 2) { Skip(proto, ref at, wire); continue; }
            int length = (int)Varint(proto, ref at), end = at + length;
            if (field == 1)
            {
                string piece = ""; float score = 0;
                while (at < end)
                {
                    var (f, w) = Tag(proto, ref at);
                    if (f == 1 && w == 2) { int n = (int)Varint(proto, ref at); piece = Encoding.UTF8.GetString(proto, at, n); at += n; }
                    else if (f == 2 && w == 5) { score = BinaryPrimitives.ReadSingleLittleEndian(proto.AsSpan(at)); at += 4; }
                    else Skip(proto, ref at, w);
                }
                int id = pieces.Count;
                string text = id == 1 ? "\n<s>\n" : id == 2 ? "\n</s>\n" : piece.Replace('\u2581', ' ');
                pieces.Add((Encoding.UTF8.GetBytes(text), score));
            }
            at = end;
        }
        using var writer = new BinaryWriter(File.Create(binPath));
        writer.Write(pieces.Max(p => p.Bytes.Length));
        foreach (var (bytes, score) in pieces) { writer.Write(score); writer.Write(bytes.Length); writer.Write(bytes); }

        static (int Field, int Wire) Tag(byte[] b, ref int at) { ulong t = Varint(b, ref at); return ((int)(t >> 3), (int)(t & 7)); }
        static ulong Varint(byte[] b, ref int at)
        {
            ulong v = 0;
            for (int shift = 0; ; shift += 7) { byte c = b[at++]; v |= (ulong)(c & 0x7F) << shift; if (c < 0x80) return v; }
        }
        static void Skip(byte[] b, ref int at, int wire)
        {
            if (wire == 0) Varint(b, ref at);
            else if (wire == 5) at += 4;
            else if (wire == 1) at += 8;
            else if (wire == 2) at += (int)Varint(b, ref at);
        }
    }
}
