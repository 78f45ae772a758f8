using System.Text;
using System.Text.Json;
using AnyPrecML.Evaluation;
using AnyPrecML.Tokenization;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Tests;

/// <summary>perplexity and eval read and tokenize their text in pieces: the tokens equal the whole text's, memory stays bounded.</summary>
[TestClass]
public sealed class StreamingTextTests
{
    private static readonly Lazy<string> Stories = new(() => string.Join('\n', File.ReadLines(TestData.TinyStories).Take(300)));

    private static IEnumerable<(string Name, Tokenizer Tokenizer)> Tokenizers()
    {
        yield return ("tok512", LlamaTokenizerLoader.Load(TestData.Tok512));
        yield return ("llama2 32K", LlamaTokenizerLoader.Load(TestData.Shared("models", "llama2-tokenizer", "tokenizer.model")));
    }

    // The reference: how the evaluator encodes pieces (BOS on the first only), written out here against the whole text's ids.
    private static List<int> EncodePieces(Tokenizer tok, IEnumerable<string> pieces)
    {
        var ids = new List<int>();
        bool first = true;
        foreach (var p in pieces)
        {
            ids.AddRange(first ? tok.EncodeToIds(p) : ((SentencePieceTokenizer)tok).EncodeToIds(p, addBeginningOfSentence: false, addEndOfSentence: false));
            first = false;
        }
        return ids;
    }

    [TestMethod]
    public void PiecesTokenizeToExactlyTheTokensOfTheWholeText()
    {
        string text = Stories.Value + "\n  two  spaces,\ttabs and trailing space \n\n" + "ünïcödé 🙂🙂 x y";
        foreach (var (name, tok) in Tokenizers())
        {
            var whole = tok.EncodeToIds(text).ToList();
            foreach (int max in new[] { 64, 100, 4096 }) // a run without a single space longer than half a piece would be cut by force
            {
                var pieces = TextPieces.Read(new StringReader(text), tok, splitLines: false, maxChars: max).Select(p => p.Text).ToList();
                Assert.IsTrue(pieces.All(p => p.Length <= max), $"{name}, {max}: a piece is over the limit");
                if (max < text.Length) Assert.IsGreaterThan(1, pieces.Count);
                CollectionAssert.AreEqual(whole, EncodePieces(tok, pieces), $"{name}: pieces of at most {max} characters");
            }
        }
    }

    [TestMethod]
    public void ALongLineStreamsToTheTokensAndDocumentsOfTheWholeLine()
    {
        // 3 pieces' worth of one line, through the public streaming API at its real piece size.
        var sb = new StringBuilder();
        while (sb.Length < 3 * TextPieces.MaxChars) sb.Append(Stories.Value.Replace('\n', ' ')).Append(' ');
        string line = sb.ToString().TrimEnd();
        string text = "short first line\n" + line + "\r\n\n   \nlast";
        foreach (var (name, tok) in Tokenizers())
        {
            var lines = text.Split('\n').Where(l => !string.IsNullOrWhiteSpace(l)).Select(l => tok.EncodeToIds(l.TrimEnd('\r')).ToArray()).ToList();
            var docs = PerplexityEvaluator.Documents(tok, new StringReader(text), 0).ToList();
            Assert.HasCount(lines.Count, docs, name);
            for (int i = 0; i < docs.Count; i++) CollectionAssert.AreEqual(lines[i], docs[i], $"{name}: document {i}");

            var cut = PerplexityEvaluator.Documents(tok, new StringReader(text), 40).ToList();
            for (int i = 0; i < cut.Count; i++) CollectionAssert.AreEqual(lines[i].Take(40).ToArray(), cut[i], $"{name}: document {i} cut to 40");

            CollectionAssert.AreEqual(tok.EncodeToIds(text).ToList(), PerplexityEvaluator.TokenStream(tok, new StringReader(text), bosPerLine: false).ToList(), $"{name}: stream");
        }
    }

    [TestMethod]
    public void TextWithoutSpacesIsCutAtTheLimitNeverInsideASurrogatePair()
    {
        var tok = LlamaTokenizerLoader.Load(TestData.Tok512);
        string text = string.Concat(Enumerable.Repeat("ab🙂", 400)); // no space to cut at
        foreach (int max in new[] { 16, 17, 100 })
        {
            var pieces = TextPieces.Read(new StringReader(text), tok, splitLines: false, maxChars: max).Select(p => p.Text).ToList();
            Assert.AreEqual(text, string.Concat(pieces), "nothing is dropped or added where there is no space");
            Assert.IsTrue(pieces.All(p => p.Length <= max && !char.IsHighSurrogate(p[^1]) && !char.IsLowSurrogate(p[0])), $"{max}: a piece splits a surrogate pair");
        }
    }

    [TestMethod]
    public void FiftyMegabyteLineIsEvaluatedInUnderOneGigabyteResident()
    {
        using var dir = TestData.NewTempDir();
        string input = dir["huge.txt"];
        string words = Stories.Value.Replace('\n', ' ') + " ";
        using (var w = new StreamWriter(input))
        {
            w.WriteLine("Once upon a time there was a cat.");
            for (long written = 0; written < 50_000_000; written += words.Length) w.Write(words);
            w.WriteLine();
            w.WriteLine("The end.");
        }
        Assert.IsGreaterThan(50_000_000L, new FileInfo(input).Length);
        var (code, json, err) = ChildCli.Run("perplexity", "--model", TestData.Stories260K, "--text", input, "--bos-per-line", "--truncate", "64", "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(json);
        var tok = LlamaTokenizerLoader.Load(TestData.Tok512);
        long expected = new[] { "Once upon a time there was a cat.", "The end." }.Sum(l => Math.Min(64, tok.EncodeToIds(l).Count) - 1) + 63;
        Assert.AreEqual(expected, doc.RootElement.GetProperty("tokens").GetInt64(), "each line is a document of its first 64 tokens");
        long peak = doc.RootElement.GetProperty("peak_resident_bytes").GetInt64();
        Assert.IsLessThan(1L << 30, peak, $"peak resident {peak / (1 << 20)} MiB");
        Console.WriteLine($"perplexity, 50 MB line: peak resident {peak / (1 << 20)} MiB");
    }
}
